"""BrightRun trainer: runs one fine-tuning attempt as its own process.

``python -m brightrun_trainer run --spec SPEC.json`` (see :mod:`.spec` for the
launch contract, the directory layout and the exit codes). Modules, in the
order an attempt uses them:

* :mod:`.spec` - the AttemptSpec contract (no torch; the server imports it);
* :mod:`.runner` - stages, signals, failures, the result;
* :mod:`.data` - chat template, assistant-only labels, truncation, split, batches;
* :mod:`.model` - tokenizer, base model (NF4 / INT8), LoRA adapters;
* :mod:`.config` - the step plan and the LoraConfig mapping;
* :mod:`.loop` - the training loop (exact resume), evaluation, metrics;
* :mod:`.state` / :mod:`.checkpoints` - checkpoint payload and atomic, checksummed folders;
* :mod:`.callbacks` / :mod:`.report` - the reporting seam and its outbox + gRPC sender;
* :mod:`.logs` - trainer.log, the log tail and redaction;
* :mod:`.tiny` - tiny deterministic models for tests, demos and benchmarks.

Importing this package imports nothing heavy; torch and transformers load
inside the runner.
"""
