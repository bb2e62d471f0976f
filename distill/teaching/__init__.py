"""The teacher side of distillation: a live teacher, its logits cached once per image (``cache``), recorded per
epoch and replayed (``record``), and the adapter that gives a teacher the input its weights expect."""
