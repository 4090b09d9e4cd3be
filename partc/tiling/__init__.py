"""Vertical tiling of spatially local runs over a tier's nodes.

- ``regions``: which layers are spatially local, the runs they form, each tile's regions;
- ``split``: where to cut a run into parts and with which grid, by predicted latency;
- ``schedule``: a tiled stage as steps across the tier's nodes, and its ``StageFn``.
"""
