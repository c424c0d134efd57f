"""Engine: the one training loop, prediction, checkpoints, run folders and multi-GPU launch.

`loop` trains whatever a task hands it as a `Job` (AMP, channels-last, DDP, accumulation,
schedule, early stopping, resume, best weights); `device` says where and how a model runs
(`Runtime`); `predict` scores a classification dataset; `checkpoint` writes resumable state
atomically; `runs` creates and reopens run folders and makes the rows of predictions.csv;
`distributed` wraps DDP. It may import `models`, `data`, `evaluation`, `config`, `io` and
`errors`, never a task.
"""
