"""llmfab.compiler"""
