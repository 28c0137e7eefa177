"""tandem's gRPC services: the styler (tokenizer, chat templates) and the model worker."""
