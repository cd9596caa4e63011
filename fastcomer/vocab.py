"""CoMER's vocabulary: PAD 0, SOS 1, EOS 2, then the symbols of dictionary.txt in file order."""
from pathlib import Path
from typing import Dict, Iterable, List, Optional

PAD_IDX, SOS_IDX, EOS_IDX = 0, 1, 2
DICTIONARY_PATH = Path(__file__).with_name("dictionary.txt")


class Vocab:
    def __init__(self, dictionary_path: Optional[str] = None):
        path = Path(dictionary_path) if dictionary_path is not None else DICTIONARY_PATH
        symbols = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        self.idx2word: List[str] = ["<pad>", "<sos>", "<eos>"] + symbols
        self.word2idx: Dict[str, int] = {w: i for i, w in enumerate(self.idx2word)}

    def __len__(self) -> int:
        return len(self.idx2word)

    def words2indices(self, words: Iterable[str]) -> List[int]:
        return [self.word2idx[w] for w in words]

    def indices2words(self, ids: Iterable[int]) -> List[str]:
        return [self.idx2word[i] for i in ids]

    def indices2label(self, ids: Iterable[int]) -> str:
        """Token ids -> CoMER's LaTeX string (symbols joined by spaces)."""
        return " ".join(self.indices2words(ids))


vocab = Vocab()
VOCAB_SIZE = len(vocab)
