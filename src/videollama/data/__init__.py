"""Video-text data, one job a file:

video.py (load_clip: one clip from a video) with container.py (declared-size checks, bounded
opening), decoding.py (timing, the one bounded walk over a video's frames) and frames.py (crop,
resize, rotate); writer.py (the torch-free shard writer) and
ingest.py (``videollama data shards``); sources.py (units, tar indexing, SampleRefs), stages.py
(the reader stages and the one chain of them), loader.py (VideoTextLoader: workers, accounting,
resume), clip_cache.py (decode once, draw windows); evalset.py (the evaluation-set reader);
shapes.py (the Shapes corpus); tokenizer.py (BPE and prompt templates); inspect.py.
"""


def __getattr__(name):  # lazy: `import videollama.data.shapes` must not import PyAV + torch
    if name == "load_clip":
        from videollama.data.video import load_clip

        return load_clip
    raise AttributeError(name)


__all__ = ["load_clip"]
