"""Tools around the lavida_shirg model: training (train.py) and evaluation (eval.py) data, schedules and helpers.

Training: synthetic_ocr (offline OCR set, also used by eval.py), training_data (LLaVA JSON / VQA / synthetic
sources), batching (budget-independent samples -> model inputs per budget), budget_schedule, lora, trainer,
run_record.
"""
