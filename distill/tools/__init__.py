"""Commands beside training: the offline demo (``demo``), linear probes of features (``probe``) and the output-bias
fit of ``distill eval`` (``bias``)."""
