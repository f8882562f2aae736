"""llmfab.sim"""
