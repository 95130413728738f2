"""The policy π_θ, shared by the proposer (which samples from it) and the learner (which trains it): the language
model with its LoRA adapter and value head (lm.py), the embedded default model (default_model.py), and how an
adapter version travels between them through the object store (adapters.py)."""
