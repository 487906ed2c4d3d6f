"""Applying a trained model: runtimes (TensorFlow, OpenVINO), prediction in tiles and strips,
post-processing (CRF, median, morphology), scoring against labels, ranking scenes by how
unsure the model is (``uncertainty``), the review page (``review``), and segmenting a folder
of scenes with resume records.

May import every package before it; only the commands at the top of res_unet import it.
"""
