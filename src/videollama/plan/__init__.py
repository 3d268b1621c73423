"""The memory planner (``videollama plan``) and the preset tables of ``videollama info``.

settings.py (what a plan is asked about), activations.py (the tensors autograd saves per block
kind, from the model's shapes), params.py (parameters, LoRA adapters and NF4 bytes counted on a
meta-device model), estimate.py (a step replayed stage by stage: the peak and what is alive at
it), advice.py (notes, and what would make a run fit), planner.py (``plan`` and
``settings_for``), report.py (the text report), cli.py (the ``plan`` command); memtrace.py
measures the allocator's peak and the saved tensors the planner is checked against; info.py is
``videollama info`` (parameters, FLOPs and FSDP memory of a preset). ``videollama plan --simulate``
runs the real training step at full size and world size on fake tensors and a fake process group:
simulate.py (the step), tracking.py (torch's memory trackers), comm.py (every collective, its
group and link), project.py (run time from those counts), simulate_cli.py (the report beside the
plan), check.py (the same tiny recipe simulated and run for real, side by side). The planner may import
``videollama.train``'s recipe types and LoRA selection; ``videollama.model`` imports nothing here.
"""
