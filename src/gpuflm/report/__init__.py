"""What users see: rendered images and the HTML report."""
