"""Parts of speculative decoding: drafts (prompt lookup in ngram.py, DeepSeek's own
multi-token-prediction layer in clusterd/models/mtp.py), exact verification of drafts
against the target's distributions (verify.py, sampling.py), and fetching the MTP
layer's files onto the node that runs the last stage (fetch.py).

Modules are imported one by one (nothing here): the coordinator needs the errors and the
file selection without mlx.
"""
