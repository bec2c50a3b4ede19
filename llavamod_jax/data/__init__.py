"""Data: LLaVA sources, chat templates, image preprocessing, grain pipelines, the synthetic demo set."""
