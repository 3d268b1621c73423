"""Curation of raw web video into clips, one job a file (pipeline.py draws the stages).

Per source video: probe.py (``probe_video``: duration, fps, size, codec, bounded), scenes.py
(``find_cuts`` / ``scene_clips``: shot boundaries and the clips between them), motion.py
(``motion_score``: mean frame difference, to drop static slideshows). Imports nothing heavy.
"""
