"""tierflow.sim: the virtual-time fleet simulator (being built)."""
