"""Engine: the training loop, checkpoints and multi-GPU launch shared by every task.

`loop` trains a model (device, AMP, schedule, early stopping, resume, best weights) and
predicts; `checkpoint` writes and reads resumable state atomically; `distributed` wraps DDP.
It may import `models`, `data`, `config`, `io` and `errors`, never a task.
"""
