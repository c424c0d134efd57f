"""Engine: the training loop, checkpoints, run folders and multi-GPU launch every task shares.

`loop` trains a model (device, AMP, schedule, early stopping, resume, best weights) and
predicts; `checkpoint` writes and reads resumable state atomically; `runs` creates and
reopens run folders and makes the rows of predictions.csv; `distributed` wraps DDP. It may
import `models`, `data`, `evaluation`, `config`, `io` and `errors`, never a task.
"""
