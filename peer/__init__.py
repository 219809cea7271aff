"""What one peer computes: Streaming DiLoCo with no network in sight.

Map of the package, bottom layer first (each module imports only those above it):

* ``quantize`` — maths of the wire formats (FP4 E3M0, int8, bf16, fp32): codes and scales.
* ``codec`` — packing: a framed, checksummed, zstd-compressed payload; ``CodecError``.
* ``fragments`` — splitting any model's parameters into fragments (its blocks found, by
  parameter order, or by name); the sync schedule, as pure functions.
* ``model`` — model specs and ``build_model``; the byte-level transformer and its presets;
  the ``LanguageModel`` protocol and the ``CausalLM`` base every built model has.
* ``hf`` — transformers causal LMs from a local folder (``hf:PATH``), offline; the one
  module ``model.build_model`` imports on demand (for such specs only), and the only one
  that imports transformers (inside its functions).
* ``fingerprint`` — what peers must agree on about a model: a description, its hash, the
  differences in words.
* ``tokenizer`` — bytes, or a local ``tokenizer.json``; its fingerprint.
* ``formats`` — reading one corpus file: text, JSON lines, Parquet, pre-tokenized ids.
* ``data`` — corpora (default: Python's stdlib) packed once into memory-mapped ids, bytes or
  tokens; batch sampling.
* ``inner`` — the inner optimizer (AdamW, warmup + cosine, clipping) and evaluation.
* ``outer`` — outer gradient, weighted mean, Nesterov outer step, merge, state hashes.
* ``config`` — :class:`OuterConfig`, the algorithm's settings (H, P, τ, α, wire, ...).
* ``averaging`` — the one interface to the network (``Averager``) and its messages.
* ``streaming`` — :class:`StreamingDiLoCo`, the outer loop of one peer (prepare / perform).
* ``simulator`` — M peers in one process over an in-memory averager; ddp / diloco / streaming.
* ``export`` — θ_g out of a checkpoint into safetensors (transformers' layout for ``hf:``
  models), and back.
* ``sampling`` — continuing a prompt with a model, seeded.

Nothing here imports grpc, hivemind or asyncio (a test enforces it): every function takes
tensors and plain values, is deterministic given a seed, and is fast to unit-test.
"""
