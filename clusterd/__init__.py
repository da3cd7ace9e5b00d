"""clusterd: run very large models across the pooled memory of several Macs."""

import os

# huggingface_hub reads this once, at its import: without it, building a
# request header fetches the hub's list of "agent harnesses" (telemetry) even
# when every file is already here. clusterd talks to the hub only to fetch
# what a node lacks.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
