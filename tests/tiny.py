"""Settings shared by tests that need a trained run (``conftest.tiny_run``) or train briefly themselves."""

# A briefly trained CartPole run: the research tools need its checkpoint (a world model), not a good one.
TINY_RUN = {"model.deter": 32, "model.hidden": 32, "model.units": 32, "model.stoch": 8, "model.classes": 4,
            "model.blocks": 4, "train.horizon": 5, "env.num_envs": 4, "train.batch_size": 2, "train.seq_len": 8,
            "train.prefill": 64, "train.train_ratio": 4.0, "train.warmup_updates": 5, "train.steps": 160,
            "train.eval_every": 10**9, "train.checkpoint_every": 10**9, "train.log_every": 50,
            "train.replay_capacity": 4 * 100}
