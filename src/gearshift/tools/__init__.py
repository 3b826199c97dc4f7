"""Offline tools beside the serving core: benchmarks and draft training. They use the public API
(`gearshift.LLM`) and the model layer; nothing in the engine imports them."""
