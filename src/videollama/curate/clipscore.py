"""CLIP similarity between a clip's frames and each candidate text (``--clip HF_CLIP_DIR``).

The score of a frame and a text is exactly transformers' ``CLIPModel(...).logits_per_image``
for them: ``exp(logit_scale) * cos(image_embeds, text_embeds)``; a clip's score for a text is
the mean over its frames. The model and tokenizer load from a local folder only
(``local_files_only``, no ``trust_remote_code``). Frames are sampled with the folder's own
preprocessing spec: its ``preprocessor_config.json`` crop size (else the vision config's
``image_size``) and mean/std (else OpenAI CLIP's), ``clip.num_frames`` at ``clip.fps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from videollama.curate.clipfiles import Spec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(model_dir: str | Path) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(size, mean, std)`` of a Hugging Face CLIP folder, read without torch."""
    from videollama.data.safe_io import read_json_object

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--clip {directory}: no config.json; not a Hugging Face CLIP folder")
    config = read_json_object(directory / "config.json", "CLIP config")
    size = int(config.get("vision_config", {}).get("image_size", 224))
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre_path = directory / "preprocessor_config.json"
    if pre_path.is_file():
        pre = read_json_object(pre_path, "CLIP preprocessor config")
        crop = pre.get("crop_size", size)
        size = int(crop.get("height", size)) if isinstance(crop, dict) else int(crop)
        mean = tuple(float(x) for x in pre.get("image_mean", mean))
        std = tuple(float(x) for x in pre.get("image_std", std))
    return size, mean, std


def clip_spec(model_dir: str | Path, num_frames: int, fps: float) -> Spec:
    return (num_frames, fps, clip_preprocess(model_dir)[0])


def normalise(frames: np.ndarray, mean, std):
    """uint8 [N, S, S, 3] -> float32 tensor [N, 3, S, S], ``(x / 255 - mean) / std``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _pooled(output):
    """transformers >= 5 returns a model output (the projected embedding as pooler_output); 4.x a tensor."""
    return output if hasattr(output, "dim") else output.pooler_output


class ClipScorer:
    """A CLIPModel and its tokenizer from ``model_dir``; :meth:`score` scores a batch of clips."""

    def __init__(self, model_dir: str | Path, *, num_frames: int, fps: float, device: str = "cpu"):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        self.size, self.mean, self.std = clip_preprocess(model_dir)
        self.spec: Spec = (num_frames, fps, self.size)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)

    def score(self, clips: list[tuple[np.ndarray, list[str]]]) -> list[dict[str, Any]]:
        """``clips``: (uint8 frames [F, S, S, 3], candidate texts) each. Returns per clip
        ``{"scores": [mean over frames of logits_per_image, per text], "embedding": mean image
        embedding (unit norm), list of floats}``."""
        import torch

        frames = np.concatenate([f for f, _ in clips])  # [sum F, S, S, 3]
        counts = [len(f) for f, _ in clips]
        texts = [t for _, ts in clips for t in ts]
        with torch.inference_mode():
            pixels = normalise(frames, self.mean, self.std).to(self.device)
            image = _pooled(self.model.get_image_features(pixel_values=pixels))  # [sum F, E]
            image = image / image.norm(p=2, dim=-1, keepdim=True)
            text = None
            if texts:
                tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len,
                                        return_tensors="pt").to(self.device)
                text = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"]))
                text = text / text.norm(p=2, dim=-1, keepdim=True)  # [sum T, E]
            scale = self.model.logit_scale.exp()
        results = []
        f0 = t0 = 0
        for (_, clip_texts), n in zip(clips, counts):
            img = image[f0:f0 + n]  # [F, E]
            scores: list[float] = []
            if clip_texts:
                logits = scale * img @ text[t0:t0 + len(clip_texts)].t()  # [F, T]: logits_per_image
                scores = [float(s) for s in logits.mean(dim=0)]
            mean_embedding = img.mean(dim=0)
            mean_embedding = mean_embedding / mean_embedding.norm().clamp_min(1e-12)
            results.append({"scores": scores, "embedding": [float(x) for x in mean_embedding]})
            f0 += n
            t0 += len(clip_texts)
        return results

