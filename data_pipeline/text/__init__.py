"""Text preparation: readers, cleaning, sentences, tokenizer, example building and the `prepare text` job."""
