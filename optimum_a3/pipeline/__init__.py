"""The compression pipeline: the per-layer loop, statistics sources and collectors, layer surgery, sinks."""
