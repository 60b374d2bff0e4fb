"""The API process's serving layer: chat templates, detokenization, stop strings and request assembly."""
