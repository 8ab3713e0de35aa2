"""Export to and import from the huginn-0125 Hugging Face format."""
