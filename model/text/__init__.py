"""Text in and out: tokenizers, chat templates, chunking a source into injections."""
