"""SPN (arXiv 2404.11317): scaling positives (generated triplets written in the dataset's own
format, ``generate.py``) and negatives (a static bank of every training image for a second
stage of any method, ``bank.py``)."""
