"""What one peer computes: Streaming DiLoCo with no network in sight.

Map of the package, bottom layer first (each module imports only those above it):

* ``quantize`` — maths of the wire formats (FP4 E3M0, int8, bf16, fp32): codes and scales.
* ``codec`` — packing: a framed, checksummed, zstd-compressed payload; ``CodecError``.
* ``model`` — the byte-level decoder-only transformer and its presets.
* ``data`` — byte corpora (default: Python's stdlib), memory-mapped; batch sampling.
* ``inner`` — the inner optimizer (AdamW, warmup + cosine, clipping) and evaluation.
* ``fragments`` — splitting parameters into fragments; the sync schedule, as pure functions.
* ``outer`` — outer gradient, weighted mean, Nesterov outer step, merge, state hashes.
* ``config`` — :class:`OuterConfig`, the algorithm's settings (H, P, τ, α, wire, ...).
* ``averaging`` — the one interface to the network (``Averager``) and its messages.
* ``streaming`` — :class:`StreamingDiLoCo`, the outer loop of one peer (prepare / perform).
* ``simulator`` — M peers in one process over an in-memory averager; ddp / diloco / streaming.

Nothing here imports grpc, hivemind or asyncio (a test enforces it): every function takes
tensors and plain values, is deterministic given a seed, and is fast to unit-test.
"""
