"""llmfab.host"""
