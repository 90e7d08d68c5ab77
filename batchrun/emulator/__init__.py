"""A local OpenAI + Gemini compatible relay, for trials, tests and benchmarks."""
