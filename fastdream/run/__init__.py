"""The run floor: every knob and preset (``config``), the training loop as named steps (``train``), atomic
checkpoints (``checkpoint``), metrics, TensorBoard and progress (``logger``)."""
