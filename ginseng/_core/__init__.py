"""Pieces shared by the rooms of ginseng (one of each): the device mesh and its arrays, pytree <->
HDF5, the classification report, atomic files, background threads and progress bars.

Internal: nothing here is part of the public API, and names may change between releases.
"""
