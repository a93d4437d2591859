"""Multi-node launch helpers (installed as ``distcomp.launch``)."""
