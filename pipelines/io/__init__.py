"""The one IO layer every stage stands on: storage, schemas, input sources, embedding tables."""
