"""Small files visadapt needs at run time (the embedded pretrained backbone), shipped as package data."""
