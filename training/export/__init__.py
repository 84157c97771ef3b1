"""Portable exports: a run's checkpoint or a fine-tuned model as safetensors, config.json and a model card.

``files`` writes and reads an export directory (shared by both model kinds), ``checkpoints`` consolidates
a DeepSpeed checkpoint of any ZeRO stage, ``bert``/``bert_read`` and ``resnet`` are the two layouts, and
``command`` is ``pretrain export``.
"""
