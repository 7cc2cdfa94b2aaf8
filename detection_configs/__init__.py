"""detection_configs"""
