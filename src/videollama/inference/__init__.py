"""Inference: loading a model directory, the one static-cache generation path, continuous batching
and int8 weights.

load.py (``load_for_inference`` and the ``--model/--adapter/--quantize`` options every inference
command shares), generate.py (prefill, the static-shape decode step and its compiled form,
sampling, ``generate``, ``generate_batch``), whole_video.py (``encode_whole_video``: a whole
video under the model's window policy -> its latents, a chunk of windows at a time), batch.py
(``BatchDecoder``: requests join and leave a running decode), quantize.py (weight-only int8/int4,
``Int8Linear``), int8_kernel.py (our C int8 kernel, built for the host, as a torch operator),
tuning.py (the measured choices: int8 product per weight shape, compiled or eager step), host.py
(the CPU, its ISA, our cache directory), cli.py (the ``videollama generate`` command).
"""
