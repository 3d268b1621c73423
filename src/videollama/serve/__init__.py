"""Serving: ``videollama serve``, an OpenAI-compatible HTTP API over one model directory, and
``videollama chat``, a web chat page over the same engine.

engine.py: the scheduler and the in-process API (``Engine``); chat_request.py: a request's
checks, state and events; videos.py: the engine's videos (bytes, preview, each encoded once);
app.py: the HTTP routes;
guard.py: what every request passes first (Host, Origin, API key, body limits, errors as JSON);
media.py: video sources and allowlists; frames.py: sandboxed decoding of the whole video's
windows, streamed; encoding.py: those windows -> a cache entry; cache.py: the video cache;
limits.py: every limit and its error; metrics.py: Prometheus metrics; cli.py: the command;
ui.py: the Gradio page and ``videollama chat``; examples.py: the example videos it offers;
timeline.py: what the page shows of a video; uploads.py: the files the page may read.
"""
