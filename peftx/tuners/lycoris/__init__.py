"""What LoHa and LoKr share (HF PEFT calls the family LyCORIS)."""
