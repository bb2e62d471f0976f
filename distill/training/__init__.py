"""Training: the trainer (``trainer``) and what it wires: the distiller (student, teacher, loss terms), one
optimiser step (``stepping``), the device and precision (``runtime``), DDP (``distributed``), the non-finite guard
(``guard``), stops inside an epoch (``midepoch``), optimisers and schedules (``optim``) and evaluation."""
