"""Loading the model's MTP layer on the last stage, to draft with: converted
once from the original checkpoint (in the node's store, or a folder on the
node) and loaded with a copy of the embedding, which the last stage does not
otherwise hold. Every failure is an MtpUnavailable naming the reason; the
shard then drafts by prompt lookup. Compute thread (MLX work)."""

from __future__ import annotations

from pathlib import Path

from clusterd.models.mtp import MtpDrafter, load_main_embedding, parameter_bytes
from clusterd.models.mtp_convert import ensure_converted, ensure_in_store
from clusterd.models.mtp_files import conversion_name
from clusterd.models.store import ModelRef, ModelStore
from clusterd.speculative.drafts import MtpUnavailable
from clusterd.wire import clusterd_pb2 as pb

LOCAL_DIR = "mtp-folders"  # conversions of originals given as folders, in the store


def load_drafter(spec: pb.MtpSpec, stage, model_dir: Path, model_id: str,
                 store: ModelStore) -> MtpDrafter:
    config = stage.config
    if not stage.bounds.last:
        raise MtpUnavailable("only the last stage drafts")
    if not config.get("num_nextn_predict_layers", 0) and spec.original_path == "" \
            and not spec.original_id:
        raise MtpUnavailable("the model declares no multi-token-prediction layer")
    if model_id:
        original = ModelRef.parse(spec.original_id) if spec.original_id else None
        folder = ensure_in_store(store, ModelRef.parse(model_id), config, original)
    elif spec.original_path:
        original_dir = Path(spec.original_path)
        if not (original_dir / "config.json").is_file():
            raise MtpUnavailable(f"the original checkpoint folder {original_dir.name!r} has "
                                 "no config.json")
        folder = store.root / LOCAL_DIR / conversion_name(original_dir.name, "local", config)
        ensure_converted(original_dir, config, folder, original_dir.name, "local")
    else:
        raise MtpUnavailable("no original checkpoint was named to take the MTP layer from")
    embed = load_main_embedding(model_dir)
    model = stage.model
    head = model.lm_head if "lm_head" in model else embed.as_linear
    return MtpDrafter.load(folder, config, embed, head)


def drafter_bytes(drafter: MtpDrafter) -> int:
    """What the drafter holds: its layer and the embedding copy."""
    return parameter_bytes(drafter.module) + parameter_bytes(drafter.embed)
