"""Datasets in the DAPO-Math / verl schema (``dataset``), prompts in dispatch order
(``prompts``), where a run's model and tokenizer live (``models``) and the embedded
default task (``task``)."""
