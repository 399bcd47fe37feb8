"""Dynamic sparse matmul for TensorFlow on the CPU, and Rig-L training on top of it.

Modules: `sparse` (patterns on the host), `ops` (the TensorFlow op), `layers`,
`optimizers`, `sparse_training` (Rig-L prune/regrow in numpy).
"""
