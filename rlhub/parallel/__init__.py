"""The learner as a group of ranks: data parallelism with sharded parameters, expert parallelism.

Where this sits: between `rlhub.learner.Learner` (one rank's optimisation)
and `rlhub.actors.learner` (the ranks as Ray actors). A rank joins one
`torch.distributed` group (`ranks`), shards the policy with FSDP2 (`fsdp`),
optionally splits each MoE layer's experts over the ranks (`experts`), takes
its share of each step's groups (`split`), and saves and loads sharded
checkpoints (`checkpoint`). Nothing here imports Ray: the ranks are tested as
plain processes, and the actors only start them and pass messages.
"""
