"""Inference engines behind one interface (``base.InferenceEngine``): Hugging Face
transformers (``hf``, portable, also used by evaluation) and vLLM (``vllm``, GPU pods;
``vllm_support`` holds its vLLM-free logic, ``vllm_settings`` its pod knobs)."""
