"""A stand-in decoder backend with BatchDecoder's interface: one row at a time (temporary)."""

from __future__ import annotations

import torch

from videollama.model.generate import decode_one_token, prefill, sample


class SerialDecoder:
    def __init__(self, model, *, max_batch: int, max_len: int, compile: bool = False) -> None:
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.rows: dict[int, dict] = {}

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    def add(self, prompt_ids, *, media_kv, temperature=0.0, top_p=1.0, seed=None):
        slot = next(i for i in range(self.max_batch) if i not in self.rows)
        device = self.model.lm_head.weight.device
        ids = torch.tensor([prompt_ids], device=device)
        caches = self.model.decoder.new_kv_cache(1, self.max_len)
        logits = prefill(self.model, ids, attention_mask=torch.ones_like(ids), media_kv=media_kv, kv_caches=caches)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        row = {"caches": caches, "media": media_kv, "t": len(prompt_ids), "temp": temperature, "top_p": top_p,
               "gen": gen}
        row["token"] = int(sample(logits, temperature=temperature, top_p=top_p, generator=gen)[0])
        self.rows[slot] = row
        return slot, row["token"]

    def step(self):
        out = {}
        for slot, row in self.rows.items():
            device = self.model.lm_head.weight.device
            if row["t"] >= self.max_len:
                continue
            token = torch.tensor([[row["token"]]], device=device)
            logits = decode_one_token(self.model, token, position=torch.tensor([[row["t"]]], device=device),
                                      key_mask=None, media_kv=row["media"], kv_caches=row["caches"], start=row["t"])
            row["t"] += 1
            row["token"] = int(sample(logits, temperature=row["temp"], top_p=row["top_p"], generator=row["gen"])[0])
            out[slot] = row["token"]
        return out

    def remove(self, slot: int) -> None:
        self.rows.pop(slot, None)
