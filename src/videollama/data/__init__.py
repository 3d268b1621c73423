"""Video-text data: the clip loader, WebDataset shards, the Shapes corpus, the tokenizer."""


def __getattr__(name):  # lazy: `import videollama.data.shapes` must not import PyAV + torch
    if name == "load_clip":
        from videollama.data.clip import load_clip

        return load_clip
    raise AttributeError(name)


__all__ = ["load_clip"]
