"""One process of the multi-process extraction tests (tests/test_distributed.py), launched alone or by
`accelerate launch` / torchrun.

    python tests/distributed_worker.py STORES LOG KINDS

fills STORES/gradients, STORES/jvp_embeddings and (if KINDS names it) STORES/sentence_embeddings from a tiny LoRA
model built from config with a fixed seed, and with "warmup" in KINDS saves a warm-up to STORES/warmup (first). KINDS
is a comma-separated subset of those four names. Every store
write appends "start end" to LOG/<kind>.<rank>. With HF_INFLUENCE_TEST_EXIT="<kind>:<rank>", that process exits
(os._exit, no clean-up) right after its first batch of that store is written.
"""

import os
import sys

import torch
from hf_influence.testing import CHAT_ROWS, end_distributed_worker, lora_model

from hf_influence.extraction.extract import extract_gradients, extract_jvp_embeddings, extract_sentence_embeddings
from hf_influence.formatting import format_dataset
from hf_influence.extraction.gradients import GradientConfig
from hf_influence.extraction.jvp import JVPConfig
from hf_influence.extraction.store import VectorStore
from hf_influence.optimizer_warmup import WarmupConfig, warmup

ROWS = CHAT_ROWS * 3  # 15 rows
# Batches of 2: 8 batches, the last one short, several per process.
GRADIENTS = GradientConfig(projection="srht", projection_dim=32, batch_size=2)
JVP = JVPConfig(num_blocks=1, jvp_projection="gaussian", jvp_projection_dim=12, jvp_batch_size=2)
SENTENCE_BATCH = 2
WARMUP = WarmupConfig(warmup_fraction=0.5, warmup_batch_size=2, warmup_learning_rate=1e-3, warmup_min_steps=0,
                      warmup_show_progress=False)


def main(stores: str, log_dir: str, kinds: str) -> None:
    # Results depend on the thread count (BLAS splits sums by thread); every process of every test uses one.
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    exit_kind, _, exit_rank = os.environ.get("HF_INFLUENCE_TEST_EXIT", "").partition(":")
    original_write = VectorStore.write

    def logged_write(store: VectorStore, start: int, rows) -> None:
        original_write(store, start, rows)
        with open(os.path.join(log_dir, f"{store.path.name}.{rank}"), "a") as log:
            log.write(f"{start} {start + len(rows)}\n")
        if store.path.name == exit_kind and rank == int(exit_rank):
            os._exit(3)

    VectorStore.write = logged_write
    model, tokenizer = lora_model("llama")
    formatted = format_dataset(ROWS, tokenizer).dataset
    kinds = kinds.split(",")
    if "warmup" in kinds:
        warmup(model, tokenizer, formatted, WARMUP, cache_dir=os.path.join(stores, "warmup"))
    if "gradients" in kinds:
        extract_gradients(model, formatted, os.path.join(stores, "gradients"), GRADIENTS, show_progress=False)
    if "jvp_embeddings" in kinds:
        extract_jvp_embeddings(model, formatted, os.path.join(stores, "jvp_embeddings"), JVP, show_progress=False)
    if "sentence_embeddings" in kinds:
        extract_sentence_embeddings(ROWS, os.path.join(stores, "sentence_embeddings"), batch_size=SENTENCE_BATCH,
                                    show_progress=False)
    end_distributed_worker()


if __name__ == "__main__":
    main(*sys.argv[1:])
