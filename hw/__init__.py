"""llmfab.hw"""
